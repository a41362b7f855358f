from llmserve.router.cli import main

main()
