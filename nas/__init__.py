"""bnnas: neural architecture search with normalization as a first-class search dimension.

The rooms, in the order data flows through them: config -> space -> build -> data -> train
-> evaluate -> study, with cli mapping it all to console scripts.
"""

__version__ = "0.1.0"
