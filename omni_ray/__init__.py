"""omni-ray: online preference alignment (Omni-DPO + DPO-PoP) on Ray."""

__version__ = "0.1.0"
