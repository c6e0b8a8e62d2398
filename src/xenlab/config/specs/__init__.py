"""The device-spec mini-languages of xl, one module each: disk, vif, pci, cpus, vnuma.

Each module offers ``parse_X`` (text to a frozen value), ``format_X`` (a
canonical spec back) and, for devices, ``X_to_libxl_json`` (libxl's JSON).
"""

from xenlab.config.specs.cpus import CpuSet, format_cpus, parse_cpus
from xenlab.config.specs.disk import DiskSpec, disk_to_libxl_json, format_disk, parse_disk
from xenlab.config.specs.pci import PciSpec, format_pci, parse_pci, pci_to_libxl_json
from xenlab.config.specs.vif import VifSpec, format_vif, parse_vif, vif_to_libxl_json
from xenlab.config.specs.vnuma import VnumaNode, parse_vnuma

__all__ = [
    "CpuSet",
    "DiskSpec",
    "PciSpec",
    "VifSpec",
    "VnumaNode",
    "disk_to_libxl_json",
    "format_cpus",
    "format_disk",
    "format_pci",
    "format_vif",
    "parse_cpus",
    "parse_disk",
    "parse_pci",
    "parse_vif",
    "parse_vnuma",
    "pci_to_libxl_json",
    "vif_to_libxl_json",
]
