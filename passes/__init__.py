"""Passes over the BWSK IR (``bwskc.passes``), one module (or package) a pass.

``manager`` runs them by name (``REGISTRY``), verifying the IR between them (``bwskc.verify``); the
passes are ``typing`` (S/K typing), ``calm`` (CALM coordination), ``fusion`` (S-phases and residual
chains outlined) and ``reversible`` (residual chains to coupling chains). ``residual`` is the symbolic
reducer fusion and reversible share to recognise residual blocks.
"""
