"""qmesh.worker"""
