__version__ = "0.1.0"

def predict(rows, model_version=None, quantiles=None):
    """Forecast `rows` (date, store_nbr, item_nbr, onpromotion) in-process: the numbers the service returns (see
    `cd4ml.deployment.predict`); with `quantiles`, e.g. [0.1, 0.9], a frame with `prediction` and one column per quantile."""
    from cd4ml.deployment import predict as _predict
    return _predict(rows, model_version, quantiles)
