"""Processes of the distributed platform: stage workers, gateway and control plane.

Each imports the core library `echox`; `echox` never imports this package.
"""
