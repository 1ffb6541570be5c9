"""Fine-tuning strategies, one file each. ``base.py`` holds the contract they implement."""
