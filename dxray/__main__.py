from dxray.cli import main

main()
