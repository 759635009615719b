"""coop_transport: π0-style cooperative VLA policies for robosuite's TwoArmTransport, from simulation to ROS 2.

The library is importable without ROS: rclpy is imported only under ``coop_transport.ros``.
"""

__version__ = "0.1.0"
