"""Managed VMs and running-VM clones (issue 14): qemu on blockprov disks, templates of a running VM
(its RAM, device state and disk at one instant) and clones resumed from them, sharing the template's
memory copy-on-write. Only the CLI imports this package."""
