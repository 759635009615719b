# coop_transport on ROS 2 Jazzy: the simulated two-arm stack (sim bridge + two policy nodes), headless.
#
#   docker build -t coop_transport .
#   docker run --rm coop_transport                                   # sim.launch.py, lockstep on simulated time
#   docker run --rm --gpus all -e MUJOCO_GL=egl coop_transport \
#       ros2 launch coop_transport sim.launch.py use_sim_time:=false  # GPU machine: 20 Hz wall clock
#   docker run --rm -v $PWD/ckpt:/ckpt coop_transport \
#       ros2 launch coop_transport sim.launch.py left_policy:=/ckpt/left right_policy:=/ckpt/right
#
# Rendering: MuJoCo through EGL (NVIDIA's with --gpus, otherwise Mesa's software EGL); MUJOCO_GL=osmesa also works.
# The real-arm stack (franka.launch.py) additionally needs franka_ros2 built from source (no Jazzy binaries) with
# a libfranka matching the robots' system version; it is not part of this image.
# Not built here (no Docker engine on the project's machines): kept short and conventional on purpose.
FROM ros:jazzy-ros-base

ENV DEBIAN_FRONTEND=noninteractive
# Headless OpenGL (EGL + OSMesa) for MuJoCo; venv support. ros-base already has rclpy, launch, launch_ros and the
# standard message packages (std, sensor, geometry, trajectory, diagnostic, rosgraph msgs, std_srvs).
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3-venv python3-pip \
        libegl1 libegl-mesa0 libgl1-mesa-dri libglvnd0 libosmesa6 \
    && rm -rf /var/lib/apt/lists/*

# The pinned Python stack in a venv that also sees the system's ROS Python packages. The ros-kilted-* wheels of
# requirements.txt are for machines without ROS and are skipped; torch comes as the CPU build.
RUN python3 -m venv --system-site-packages /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY requirements.txt /opt/coop_transport/requirements.txt
RUN grep -v '^ros-kilted-' /opt/coop_transport/requirements.txt > /tmp/requirements-image.txt \
    && pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu \
        -r /tmp/requirements-image.txt \
    && pip install --no-cache-dir colcon-common-extensions

# The workspace. The package's launch/ and config/ are links to the repository root's, so both are copied.
COPY launch /opt/coop_transport/launch
COPY config /opt/coop_transport/config
COPY ros2_ws/src /opt/coop_transport/ros2_ws/src
COPY export /opt/coop_transport/export
WORKDIR /opt/coop_transport/ros2_ws
# The default policy's ONNX export, installed beside it as package data (backend "auto" uses it on CPU hosts).
RUN PYTHONPATH=src/coop_transport python3 /opt/coop_transport/export/export.py --parity-trials 1 \
        --out src/coop_transport/coop_transport/assets/policies/per_arm_small/export
# colcon from the venv: the node executables then run on the venv's interpreter (torch, mujoco, robosuite).
RUN rm -rf src/coop_transport/build src/coop_transport/*.egg-info \
    && . /opt/ros/jazzy/setup.sh \
    && colcon build --merge-install --event-handlers console_direct+

ENV MUJOCO_GL=egl \
    PYOPENGL_PLATFORM=egl \
    ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
# The official image's entrypoint sources /opt/ros/jazzy; the workspace overlay is sourced here.
CMD ["bash", "-c", "source /opt/coop_transport/ros2_ws/install/setup.bash && exec ros2 launch coop_transport sim.launch.py"]
