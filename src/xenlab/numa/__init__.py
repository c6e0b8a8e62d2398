"""Host topology (pCPUs, caches, sockets, NUMA nodes), shared by the simulator and the toolstack."""
