"""MLflow "model from code" for ``fbta-segmenter``: MLflow runs this file at load time (nothing is unpickled)."""
from mlflow.models import set_model

from fbta.registry.pyfunc import SegmenterModel

set_model(SegmenterModel())
