"""Network boot onto the machine's own disk: the blockprov initramfs (issue 13).

``initramfs`` builds, on the repository's side, the boot program a PC gets from ``GET /v1/boot/MAC``:
an initramfs holding busybox, the kernel modules, Debian's python3 trimmed to the modules the
in-machine agent imports, and blockprov. Inside the machine, ``machine`` is PID 1 (DHCP, the
disk, the switch to the real root), ``inagent`` is the agent serving the root from the local disk,
``disk`` owns the disk's layout and ``kernelnbd`` hands an NBD export to the kernel's NBD client.
"""
