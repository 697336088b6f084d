"""`python -m mmrec.registry`: list versions, move champion, roll back (mmrec/registry/models.py)."""
from mmrec.registry.models import main

if __name__ == "__main__":
    main()
