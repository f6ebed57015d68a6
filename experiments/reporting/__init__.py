"""The report's pieces: loading the committed metrics (`results`) and one module per experiment."""
