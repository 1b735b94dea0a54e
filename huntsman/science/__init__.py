"""The science layer: functions and frozen records over FITS files and arrays; no database, no queues."""
