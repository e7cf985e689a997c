"""Distribution tests: each backend's run needs its devices configured before any op, in its own process.

`make distribution` runs this folder with KERAS_BACKEND=jax and
XLA_FLAGS=--xla_force_host_platform_device_count=4 (4 virtual CPU devices), then with KERAS_BACKEND=tensorflow
(the CPU split into 2 logical devices here, before any op runs).
"""

import keras

if keras.backend.backend() == "tensorflow":
    import tensorflow as tf

    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2
    )
