"""Real two-arm stack: franka_ros2 for both arms, wrist cameras, one policy node and one Franka bridge per arm.

    ros2 launch coop_transport franka.launch.py left_robot_ip:=172.16.0.2 right_robot_ip:=172.16.0.3 \
        robot_type:=fr3 left_policy:=CKPT right_policy:=CKPT [left_camera_serial:=...] [right_camera_serial:=...]

The arms do not move until enabled, each on its own:
``ros2 service call /left/enable std_srvs/srv/SetBool "{data: true}"``.
The node graph is described once in ``coop_transport.ros.graph``.
"""

from coop_transport.ros.graph import launch_description


def generate_launch_description():
    return launch_description("franka")
