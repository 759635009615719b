"""ament_python package of coop_transport; ``pip install -e ros2_ws/src/coop_transport`` installs the library too."""

from glob import glob

from setuptools import find_packages, setup

PACKAGE = "coop_transport"

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(exclude=["test", "tests"]),
    package_data={PACKAGE: ["assets/**/*"]},
    include_package_data=True,
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.py")),
        (f"share/{PACKAGE}/config", glob("config/*.yaml")),
    ],
    install_requires=["setuptools"],
    zip_safe=False,
    maintainer="coop_transport developers",
    maintainer_email="coop-transport@example.org",
    description="Cooperative π0-style VLA control of two Franka Panda arms on TwoArmTransport, sim to ROS 2.",
    license="Apache-2.0",
    entry_points={"console_scripts": []},
)
