"""A scripted command source standing in for a policy node: publishes one constant 7-D command on ``<ns>/command``
at 20 Hz until it is stopped or killed. Usage: ``python tests/command_source.py /left 0.05,0,0,0,0,0,-1``."""

import sys

import numpy as np
import rclpy
from rclpy.qos import QoSProfile
from sensor_msgs.msg import JointState

from coop_transport.constants import CONTROL_FREQ
from coop_transport.ros import codec, topics


def main() -> None:
    namespace, values = sys.argv[1], np.array([float(v) for v in sys.argv[2].split(",")])
    rclpy.init()
    node = rclpy.create_node("command_source", namespace=namespace)
    pub = node.create_publisher(JointState, topics.COMMAND, QoSProfile(depth=10))
    node.create_timer(1.0 / CONTROL_FREQ, lambda: pub.publish(codec.command_msg(values, node.get_clock().now().to_msg())))
    print("publishing", flush=True)
    try:
        rclpy.spin(node)
    except KeyboardInterrupt:
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
