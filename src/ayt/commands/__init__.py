"""The commands of `ayt` that have their own modules (`eval`, `fid-stats`, `tangents`): flags and
the code that wires them to the library. Imported by `ayt --help`, so stdlib only at import time;
`ayt.cli` holds the parser root and the smaller commands."""
