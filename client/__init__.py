"""qmesh.client"""
