"""Diagnostics for the paper's theory: spectral suppression, regularisation trap, proxy fidelity.

:mod:`.theory` holds the formulas, :mod:`.fidelity` the proxy-versus-exact hypergradient
comparison, :mod:`.run` the ``metake diagnose`` session and :mod:`.plots` its figures.
"""
