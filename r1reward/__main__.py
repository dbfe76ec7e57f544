"""``python -m r1reward`` is the trainer (``python -m r1reward.train``)."""
from r1reward.train import main

if __name__ == "__main__":
    main()
