"""What the user runs: the command line (a thin layer over the library), inspect and verify.
"""
