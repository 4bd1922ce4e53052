"""Searching on several machines: Ray workers and the storage proxy's server.

ray_workers   nas-search --ray-workers
proxy_server  nas-storage-proxy
"""
