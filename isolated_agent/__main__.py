from isolated_agent.cli.main import main

main()
