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
TORCHFUNC_SUITE = {
    "test_jac_aux_pytree": "message wording: a non-tensor aux is refused (RuntimeError and TypeError) "
    "with \"aux must be a tensor or a pytree of tensors, but aux[1] is a int\", not torch.func's "
    "\"Expected tensors, got unsupported type\"",
    "test_jac_outputs_can_any_pytree": "message wording: fwdgrad names jacfwd (not the inner \"jvp(f, "
    "primals, tangents)\") and says \"expected func to return at least one tensor\" / \"func must "
    "return a tensor or a pytree of tensors\"; the pytree outputs themselves pass",
    "test_jvp_outputs_can_any_pytree": "message wording, as test_jac_outputs_can_any_pytree: errors are "
    "prefixed \"jvp:\", not \"jvp(f, primals, tangents):\"; the pytree outputs pass",
    "test_jvp_aux_tensor": "message wording: \"with has_aux=True, func must return a pair (output, "
    "aux)\", not \"output of function f should be a tuple\"; the values pass",
    "test_jvp_aux_pytree": "message wording, as test_jac_aux_pytree; the values pass",
    "test_linearize_errors": "message wording: jvp_fn's errors name the tangent (\"jvp_fn's tangents "
    "must have the structure of the primals\", \"the tangent of primals[0] has shape ...\"), not "
    "torch.func's \"argspec\" and \"flattened pytree\" phrases",
}
