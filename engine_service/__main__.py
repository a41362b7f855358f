from llmserve.engine_service.cli import main

main()
