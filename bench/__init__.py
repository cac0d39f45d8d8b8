"""The benchmark harness: `python -m bench` (see bench/run.py); results under bench/results/."""

# The five questions about one image of the multi_question scenario (bench/run.py) and of bench/device_check.py; here
# so that the device check, which runs where bench.run's imports (Ray, LitServe) are not installed, shares them.
QUESTIONS = (
    "what is in the picture?",
    "what colour is the block?",
    "where is the block?",
    "is it large?",
    "what is it?",
)
