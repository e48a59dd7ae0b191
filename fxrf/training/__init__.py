"""Training utilities, in one home: the data sets fxrf's tests and benchmarks generate offline (`datasets`), training
and distillation (`distill`), and the calibration that brings a rewritten model back to the original before any
training (`calibrate`: least-squares block fits, batch-norm re-estimation, fidelity). They import nothing of fxrf but
its errors: a result of the passes is read through its `graph_module` and `changes`."""
