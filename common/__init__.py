"""qmesh.common"""
