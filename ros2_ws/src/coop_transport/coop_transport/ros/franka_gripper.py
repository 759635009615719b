"""Gripper side of the Franka bridge: a hysteresis on the command's gripper value and franka_gripper's actions.

``franka_msgs`` (franka_ros2's interfaces) exists only in a ROS 2 install with franka_ros2 built; there are no
wheels. ``FrankaGripperClient`` therefore imports it lazily and, without it, reports itself unavailable with the
reason (the arm part of the bridge keeps working; diagnostics show the gripper as unavailable).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class GripperHysteresis:
    """Turns the continuous gripper command (-1 open .. +1 close) into open/close events, each once."""

    close_above: float = 0.5
    open_below: float = -0.5
    state: str | None = None  # "open" / "close" once decided

    def update(self, value: float) -> str | None:
        """The new state when ``value`` crosses a threshold away from the current one, else None."""
        if value > self.close_above and self.state != "close":
            self.state = "close"
            return "close"
        if value < self.open_below and self.state != "open":
            self.state = "open"
            return "open"
        return None


class FrankaGripperClient:
    """franka_gripper's ``move`` (open) and ``grasp`` (close) actions under ``action_namespace``."""

    def __init__(self, node, action_namespace: str, open_width: float = 0.08, speed: float = 0.05,
                 force: float = 20.0):
        self.node, self.open_width, self.speed, self.force = node, open_width, speed, force
        self.sent: list[str] = []
        try:
            from franka_msgs.action import Grasp, Move
        except ImportError as err:
            self.available = False
            self.reason = (f"franka_msgs is not installed ({err}); build franka_ros2 in this workspace to drive "
                           f"the gripper")
            return
        from rclpy.action import ActionClient

        self._Grasp, self._Move = Grasp, Move
        ns = action_namespace.rstrip("/")
        self._move = ActionClient(node, Move, f"{ns}/move")
        self._grasp = ActionClient(node, Grasp, f"{ns}/grasp")
        self.available = True
        self.reason = f"actions {ns}/move and {ns}/grasp"

    def ready(self) -> bool:
        return self.available and self._move.server_is_ready() and self._grasp.server_is_ready()

    def send(self, state: str) -> bool:
        """Send an open or close goal (asynchronous; a newer goal supersedes). False when it cannot be sent."""
        if not self.ready():
            return False
        if state == "open":
            self._move.send_goal_async(self._Move.Goal(width=self.open_width, speed=self.speed))
        else:
            goal = self._Grasp.Goal(width=0.0, speed=self.speed, force=self.force)
            goal.epsilon.inner = goal.epsilon.outer = self.open_width  # succeed whatever the object's width
            self._grasp.send_goal_async(goal)
        self.sent.append(state)
        return True


class NoGripper:
    """``gripper:=none``: gripper commands are ignored."""

    available = False
    reason = "disabled by the gripper parameter"
    sent: list[str] = []

    def ready(self) -> bool:
        return False

    def send(self, state: str) -> bool:
        return False
