"""Publishing from a node's own threads (the libfranka I/O thread, the policy node's planner), not the executor's.

rclpy's signal handler shuts the context down on the main thread; a thread that checked ``context.ok()`` just
before may then publish into the dead context, and rclpy raises ("publisher's context is invalid"). That is a
normal stop, not a failure: ``quiet_on_shutdown`` swallows an exception raised once the context is down and
re-raises anything that fails while ROS is up. (The sim bridge's step loop applies the same rule to its whole
loop: a failure after the context went down ends it as a normal stop.)
"""

from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def quiet_on_shutdown(node):
    """``with quiet_on_shutdown(node): node.pub.publish(msg)`` from a non-executor thread (see the module)."""
    try:
        yield
    except Exception:
        if node.context.ok():
            raise
