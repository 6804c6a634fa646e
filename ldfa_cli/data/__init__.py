from .load import TrainingData, dataset_shape, load_data, steps_per_epoch  # noqa: F401
