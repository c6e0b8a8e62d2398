"""Microcode work: scan initrds and bundles, select for a CPU, extract, build early cpios.

Built on ``xenlab.formats`` (cpio, compress, intel_ucode, amd_ucode); the CLI
in ``xenlab.cli.ucode`` is a thin shell over this room.
"""
