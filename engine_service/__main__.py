from llmserve.engine_service.cli import main

# The guard matters: the core process is spawned and re-imports the main module.
if __name__ == "__main__":
    main()
