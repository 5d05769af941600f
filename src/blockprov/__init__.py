"""blockprov: provision machines and VMs from golden disk images at block level."""

__version__ = "0.1.0"
