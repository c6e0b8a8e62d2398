"""The hypervisor simulator: a deterministic discrete-event model of a Xen host.

``engine`` (the clock and event heap), ``model`` (vCPUs, domains, pCPUs),
``host`` (the dispatcher Xen's schedulers plug into), ``schedulers`` (one
module per policy), ``workload`` (what vCPUs do), ``metrics`` (what a run
measured).  Pure: no processes, no files, no wall clock; a run is a function
of its scenario and seed.
"""
