"""The AnyLearn backend emulator behind ``anylearn-reporter serve``: for local runs, tests and benchmarks.

Nothing here runs in a training container; the agent (hook, wrapper, sidecar) never imports this package.
"""
