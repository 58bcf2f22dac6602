"""Passes over the BWSK IR (``bwskc.passes``), one file a pass.

The pass manager, S/K typing, CALM coordination analysis, S-phase fusion and the reversible rewrite
land here (see the open issues); the IR verifier they run between passes is ``bwskc.verify``.
"""
