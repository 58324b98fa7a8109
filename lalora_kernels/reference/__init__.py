"""Pure-PyTorch, float64-capable implementation of SPEC.md: one file per ``lalora::`` op (named
after it), the packed format (``packed_format``) and the per-adapter closed form
(``closed_form``). The kernel of every op on devices without a faster one, and the oracle every
other backend is tested against. Import from the submodules."""
