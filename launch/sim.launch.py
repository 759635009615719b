"""Simulated two-arm stack: the MuJoCo sim bridge and one policy node per arm.

    ros2 launch coop_transport sim.launch.py [left_policy:=CKPT] [right_policy:=CKPT] [use_sim_time:=true]
        [chunk_length:=10] [num_samples:=4] [clip_sigma:=2.0] [clip_beyond_demonstrated:=true] [image_size:=96] ...

``ros2 launch coop_transport sim.launch.py --show-args`` lists every argument. The node graph is described once in
``coop_transport.ros.graph``; ``python -m coop_transport.bringup sim`` starts the same nodes without ros2 launch.
"""

from coop_transport.ros.graph import launch_description


def generate_launch_description():
    return launch_description("sim")
