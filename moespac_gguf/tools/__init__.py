"""Tools that measure the runtime on this machine: the memory-capped benchmark (bench), the cost
calibration (calibrate) and the memory cgroups they run in (memcap). The library never imports
them."""
