"""qmesh.broker"""
