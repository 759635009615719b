"""ROS 2 layer of coop_transport: per-arm policy nodes, the MuJoCo sim bridge, the Franka bridge, the node graph.

This is the only package of the library that imports rclpy, and only in the node modules and ``codec``; ``graph``,
``safety``, ``threads`` and ``topics`` are plain Python so that launch files, the bringup and tests can use them
anywhere.
Topic layouts are documented in TOPICS.md at the package root.
"""
