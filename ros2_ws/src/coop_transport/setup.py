"""ament_python package of coop_transport; ``pip install -e ros2_ws/src/coop_transport`` installs the library too.

``launch`` and ``config`` here are symbolic links to the repository root's ``launch/`` and ``config/`` (one copy
of each file, edited at the root): colcon, ``pip install`` and ``setup.py`` builds all follow them and install the
files into ``share/coop_transport/``. An editable install (``pip install -e``) installs no data files; the bringup
registers the source tree in the ament index instead (``coop_transport.ros.paths``).
"""

from glob import glob

from setuptools import find_packages, setup

PACKAGE = "coop_transport"

NODES = {  # console script -> module (each module has main())
    "policy_node": "coop_transport.ros.policy_node",
    "sim_bridge_node": "coop_transport.ros.sim_bridge_node",
    "franka_bridge_node": "coop_transport.ros.franka_bridge_node",
    "replay_node": "coop_transport.ros.replay_node",
}

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(exclude=["test", "tests"]),
    package_data={PACKAGE: ["assets/**/*"]},
    include_package_data=True,
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml", "TOPICS.md"]),
        (f"share/{PACKAGE}/launch", sorted(glob("launch/*.launch.py"))),
        (f"share/{PACKAGE}/config", sorted(glob("config/*.yaml"))),
    ],
    install_requires=["setuptools"],
    zip_safe=False,
    maintainer="coop_transport developers",
    maintainer_email="coop-transport@example.org",
    description="Cooperative π0-style VLA control of two Franka Panda arms on TwoArmTransport, sim to ROS 2.",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [f"{name} = {module}:main" for name, module in NODES.items()]
        + ["coop_transport_bringup = coop_transport.bringup:main"],
    },
)
