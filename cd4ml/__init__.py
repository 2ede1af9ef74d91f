__version__ = "0.1.0"

def predict(rows, model_version=None):
    "Forecast `rows` (date, store_nbr, item_nbr, onpromotion) in-process: the numbers the service returns (see `cd4ml.deployment.predict`)."
    from cd4ml.deployment import predict as _predict
    return _predict(rows, model_version)
