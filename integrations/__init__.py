"""Integrations: TensorBoard sink and Lightning callback (imported by the user when needed).

>>> from collapse_monitor.integrations.tensorboard import TensorBoardSink
"""

if __name__ != "collapse_monitor.integrations":
    raise ImportError(
        f"this package is collapse_monitor.integrations; it was imported as '{__name__}' (from a "
        "checkout's 'integrations' folder). Install collapse-monitor (pip install -e .) and "
        "`import collapse_monitor.integrations`"
    )
