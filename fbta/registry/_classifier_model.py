"""MLflow "model from code" for ``fbta-classifier``: MLflow runs this file at load time (nothing is unpickled)."""
from mlflow.models import set_model

from fbta.registry.pyfunc import ClassifierModel

set_model(ClassifierModel())
