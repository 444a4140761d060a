"""Every OpInfo op that fwdgrad does not pass yet, with the reason.

Keep this list honest: tests/test_opinfo.py fails when a listed op starts to pass.
"""

EXPECTED_FAILURES = {
    "sparse.sampled_addmm": "sparse CSR inputs: the Dual wrapper subclass is made with strides, "
    "which CSR tensors do not have (torch.func.jvp does not support these either)",
    "sparse.mm.reduce": "sparse CSR inputs: the Dual wrapper subclass is made with strides, "
    "which CSR tensors do not have (torch.func.jvp does not support these either)",
}

# tests/test_zoo.py: "<model>-<attention path>-<check>" -> why it fails (not fwdgrad's fault).
ZOO_EXPECTED_FAILURES = {}
# tests/test_torchfunc_suite.py: PyTorch's torch.func tests run on fwdgrad; test name -> why it fails.
TORCHFUNC_SUITE = {}  # every transcribed test passes
