"""Pure readers and writers of on-disk formats: no I/O, no processes, no policy.

Each module takes bytes (``bytes``, ``memoryview`` or an ``mmap``) and an
offset, and returns frozen values with the offsets they came from, so a caller
can name the byte a problem is at.  Writers return ``bytes``.

- ``cpio``: newc (070701), crc (070702) and odc (070707) archives, the
  kernel's initramfs rules, a newc writer.
- ``compress``: compression detection by magic and streaming decompression.
- ``intel_ucode``: Intel microcode updates (SDM vol. 3A, 9.11) and ``.dat`` text.
- ``amd_ucode``: AMD microcode containers (equivalence table + patches).
"""
