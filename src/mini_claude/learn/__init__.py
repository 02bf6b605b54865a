"""Classical machine learning from scratch in numpy: a linear SVM, an LSTM layer, 2-D convolution, matmul.

Each module teaches one idea and is checked against the library that does it for real (scikit-learn's
`LinearSVC`, `torch.nn.LSTM`, `torch.nn.functional.conv2d`, numpy's BLAS). Nothing else in the package
depends on these modules.
"""
